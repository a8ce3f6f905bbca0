from pipeline_pkg import stages
from pipeline_pkg.snakemake_job import job

w = snakemake.wildcards
inp = snakemake.input
with job(snakemake, "evaluate") as config:
    stages.evaluate(config, w.dataset, w.attack, w.arch, int(w.seed), w.defense, inp.poison,
                    inp.backdoored, inp.purified, inp.report or None, snakemake.output[0],
                    inp.undefended or None)
