from pipeline_pkg import stages
from pipeline_pkg.snakemake_job import job

w = snakemake.wildcards
with job(snakemake, "poison") as config:
    stages.poison(config, w.dataset, w.attack, int(w.seed), snakemake.input.data, snakemake.output[0])
