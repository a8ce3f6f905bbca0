rule poison:
    input:
        data=f"{RESULTS}/data/{{dataset}}.h5",
    output:
        f"{RESULTS}/{{dataset}}/{{attack}}/poison-seed{{seed}}.h5",
    params:
        settings=job_settings,
    log:
        f"{LOGS}/poison/{{dataset}}/{{attack}}/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/poison/{{dataset}}/{{attack}}/seed{{seed}}.tsv"
    threads: 1
    conda:
        CONDA_ENV
    script:
        "../scripts/poison.py"
