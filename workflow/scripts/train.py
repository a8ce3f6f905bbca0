from pipeline_pkg import stages
from pipeline_pkg.snakemake_job import job

w = snakemake.wildcards
with job(snakemake, "train") as config:
    stages.train(config, w.dataset, w.attack, w.arch, int(w.seed), snakemake.input.poison,
                 snakemake.output.model)
