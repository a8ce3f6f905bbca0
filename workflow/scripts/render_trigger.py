from pipeline_pkg.render import render_trigger
from pipeline_pkg.snakemake_job import job

with job(snakemake, "render-trigger") as config:
    render_trigger(snakemake.input.poison, snakemake.output[0])
