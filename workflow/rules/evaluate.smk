rule evaluate:
    # A method folder is a defense or detect-<detector> (made by the retrain rule). `none` evaluates
    # the trained model itself and has no purify report.
    wildcard_constraints:
        defense="[A-Za-z0-9_]+|detect-[A-Za-z0-9_]+",
    input:
        poison=f"{RESULTS}/{{dataset}}/{{attack}}/poison-seed{{seed}}.h5",
        backdoored=f"{RESULTS}/{RUN}/model.pt",
        purified=purified_input,
        report=purify_report_input,
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
