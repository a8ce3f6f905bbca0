from pipeline_pkg import stages
from pipeline_pkg.snakemake_job import job

dataset = snakemake.wildcards.get("dataset", "rf1024")
with job(snakemake, "build-dataset", dataset=dataset) as config:
    stages.build_dataset(config, dataset, snakemake.output[0], snakemake.input.manifest)
