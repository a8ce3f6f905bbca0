# Every dataset passes through download: it fetches and verifies the raw files (none for a generated
# dataset such as rf1024) and writes a manifest of them that the dataset's HDF5 file records.
# Downloads run on the head node: cluster compute nodes often have no internet.
localrules:
    download,


rule download:
    output:
        f"{DATA_ROOT}/{{dataset}}/manifest.json",
    params:
        settings=lambda w: stages.dataset_obj(config, w.dataset).params,
    log:
        f"{LOGS}/download/{{dataset}}.log",
    benchmark:
        f"{BENCH}/download/{{dataset}}.tsv"
    retries: 2
    conda:
        CONDA_ENV
    script:
        "../scripts/download.py"
