rule purify:
    # Any defense but `none`: its evaluation reads the trained model, so no job copies it.
    wildcard_constraints:
        defense="(?!none(?![A-Za-z0-9_]))[A-Za-z0-9_]+",
    input:
        poison=f"{RESULTS}/{{dataset}}/{{attack}}/poison-seed{{seed}}.h5",
        model=f"{RESULTS}/{RUN}/model.pt",
    output:
        model=f"{RESULTS}/{RUN}/{{defense}}/model.pt",
        report=f"{RESULTS}/{RUN}/{{defense}}/purify.json",
    params:
        settings=job_settings,
    log:
        f"{LOGS}/purify/{RUN}/{{defense}}.log",
    benchmark:
        f"{BENCH}/purify/{RUN}/{{defense}}.tsv"
    threads: config["threads"]
    conda:
        CONDA_ENV
    script:
        "../scripts/purify.py"
