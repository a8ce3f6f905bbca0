from pipeline_pkg.aggregate import aggregate
from pipeline_pkg.snakemake_job import job

with job(snakemake, "aggregate") as config:
    aggregate(list(snakemake.input.metrics), snakemake.params.out_dir, config=config,
              dataset=snakemake.wildcards.dataset, detection_files=list(snakemake.input.detections))
