rule evaluate:
    # A method folder is a defense or detect-<detector> (made by the retrain rule).
    wildcard_constraints:
        defense="[A-Za-z0-9_]+|detect-[A-Za-z0-9_]+",
    input:
        poison=f"{RESULTS}/{{dataset}}/{{attack}}/poison-seed{{seed}}.h5",
        backdoored=f"{RESULTS}/{RUN}/model.pt",
        purified=f"{RESULTS}/{RUN}/{{defense}}/model.pt",
        report=f"{RESULTS}/{RUN}/{{defense}}/purify.json",
        undefended=undefended_input,
    output:
        f"{RESULTS}/{RUN}/{{defense}}/metrics.json",
    params:
        settings=job_settings,
        measurements=config["evaluate"],
    log:
        f"{LOGS}/evaluate/{RUN}/{{defense}}.log",
    benchmark:
        f"{BENCH}/evaluate/{RUN}/{{defense}}.tsv"
    threads: config["threads"]
    conda:
        CONDA_ENV
    script:
        "../scripts/evaluate.py"
