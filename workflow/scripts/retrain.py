from pipeline_pkg import stages
from pipeline_pkg.snakemake_job import job

w = snakemake.wildcards
inp = snakemake.input
with job(snakemake, "retrain") as config:
    stages.retrain(config, w.dataset, w.attack, w.arch, int(w.seed), w.detector, inp.poison, inp.flagged,
                   inp.detection, snakemake.output.model, snakemake.output.report)
