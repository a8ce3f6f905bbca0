# Detection as a peer of purification: each detector scores the training samples of one trained run,
# flags the most suspicious ones, and a fresh model is trained without them. The results sit beside
# the defenses' as detect-<detector>/, so evaluate and aggregate treat them as method detect:<detector>.
rule detect:
    input:
        poison=f"{RESULTS}/{{dataset}}/{{attack}}/poison-seed{{seed}}.h5",
        model=f"{RESULTS}/{RUN}/model.pt",
        snapshots=f"{RESULTS}/{RUN}/snapshots.pt",
    output:
        detection=f"{RESULTS}/{RUN}/detect-{{detector}}/detection.json",
        flagged=f"{RESULTS}/{RUN}/detect-{{detector}}/flagged.h5",
    params:
        settings=detect_settings,
        out_dir=lambda w, output: os.path.dirname(output.detection),
    log:
        f"{LOGS}/detect/{RUN}/{{detector}}.log",
    benchmark:
        f"{BENCH}/detect/{RUN}/{{detector}}.tsv"
    threads: config["threads"]
    conda:
        CONDA_ENV
    script:
        "../scripts/detect.py"


rule retrain:
    input:
        poison=f"{RESULTS}/{{dataset}}/{{attack}}/poison-seed{{seed}}.h5",
        flagged=f"{RESULTS}/{RUN}/detect-{{detector}}/flagged.h5",
        detection=f"{RESULTS}/{RUN}/detect-{{detector}}/detection.json",
    output:
        model=f"{RESULTS}/{RUN}/detect-{{detector}}/model.pt",
        report=f"{RESULTS}/{RUN}/detect-{{detector}}/purify.json",
    params:
        settings=detect_settings,
    log:
        f"{LOGS}/retrain/{RUN}/{{detector}}.log",
    benchmark:
        f"{BENCH}/retrain/{RUN}/{{detector}}.tsv"
    threads: config["threads"]
    conda:
        CONDA_ENV
    script:
        "../scripts/retrain.py"
