from pipeline_pkg import stages
from pipeline_pkg.snakemake_job import job

w = snakemake.wildcards
with job(snakemake, "purify") as config:
    stages.purify(config, w.dataset, w.attack, w.arch, int(w.seed), w.defense, snakemake.input.poison,
                  snakemake.input.model, snakemake.output.model, snakemake.output.report)
