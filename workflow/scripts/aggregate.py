from pipeline_pkg.aggregate import aggregate
from pipeline_pkg.snakemake_job import job

with job(snakemake, "aggregate") as config:
    aggregate(list(snakemake.input), snakemake.params.out_dir, config=config,
              dataset=snakemake.wildcards.dataset)
