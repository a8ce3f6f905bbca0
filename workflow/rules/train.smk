rule train:
    input:
        poison=f"{RESULTS}/{{dataset}}/{{attack}}/poison-seed{{seed}}.h5",
    output:
        model=f"{RESULTS}/{RUN}/model.pt",
        history=f"{RESULTS}/{RUN}/train.json",
        snapshots=f"{RESULTS}/{RUN}/snapshots.pt",
    params:
        settings=job_settings,
        ensemble=config["detection"]["ensemble"],
    log:
        f"{LOGS}/train/{RUN}.log",
    benchmark:
        f"{BENCH}/train/{RUN}.tsv"
    threads: config["threads"]
    conda:
        CONDA_ENV
    script:
        "../scripts/train.py"
