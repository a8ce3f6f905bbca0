from pipeline_pkg import stages
from pipeline_pkg.snakemake_job import job

w = snakemake.wildcards
inp = snakemake.input
with job(snakemake, "detect") as config:
    stages.detect(config, w.dataset, w.attack, w.arch, int(w.seed), w.detector, inp.poison, inp.model,
                  inp.snapshots, snakemake.params.out_dir)
