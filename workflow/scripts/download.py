from pipeline_pkg import stages
from pipeline_pkg.snakemake_job import job

with job(snakemake, "download") as config:
    stages.download(config, snakemake.wildcards.dataset, snakemake.output[0])
