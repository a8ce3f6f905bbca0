# Backdoor attack and purification benchmark:
# download → generate RF1024 → poison → train → purify (or detect → retrain) → evaluate → aggregate.
# Every rule's logic lives in pipeline_pkg; the scripts in workflow/scripts only call it.

from snakemake.utils import min_version, validate

min_version("9.0")


# The default config, unless another is given with --configfile: that one replaces it rather than being
# merged into it (merged, config/modelnet40.yaml would also run the default's datasets).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


wildcard_constraints:
    dataset="[A-Za-z0-9_]+",
    attack="[A-Za-z0-9_]+",
    arch="[A-Za-z0-9_]+",
    defense="[A-Za-z0-9_]+",
    detector="[A-Za-z0-9_]+",
    seed="[0-9]+",


include: "workflow/rules/download.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/poison.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/purify.smk"
include: "workflow/rules/detect.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/render.smk"


onstart:
    # Keep the resolved config where the CLI reruns in each job's log point. Then create the MLflow
    # database and experiment once, before parallel jobs race to migrate the schema, and open the
    # parent run that groups this invocation's jobs (its id reaches them through the environment).
    from pipeline_pkg.tracking import start_invocation
    import yaml

    with atomic_path(paths.resolved_config_file(RESULTS)) as tmp:
        tmp.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    start_invocation(config)


onsuccess:
    from pipeline_pkg.tracking import end_invocation

    end_invocation(config, success=True)


onerror:
    from pipeline_pkg.tracking import end_invocation

    end_invocation(config, success=False)


rule all:
    input:
        all_summaries(),
        trigger_figures(),
    default_target: True
