rule aggregate:
    input:
        metrics=dataset_metrics,
        detections=dataset_detections,
    output:
        csv=f"{RESULTS}/summary/{{dataset}}.csv",
        md=report(
            f"{RESULTS}/summary/{{dataset}}.md",
            caption="../report/table.rst",
            category="Results",
            labels={"dataset": "{dataset}", "type": "table"},
        ),
        png=report(
            f"{RESULTS}/summary/{{dataset}}.png",
            caption="../report/plot.rst",
            category="Results",
            labels={"dataset": "{dataset}", "type": "ASR vs ACC"},
        ),
        detection_csv=f"{RESULTS}/summary/{{dataset}}.detection.csv",
        detection_md=report(
            f"{RESULTS}/summary/{{dataset}}.detection.md",
            caption="../report/detection.rst",
            category="Results",
            labels={"dataset": "{dataset}", "type": "poison detection"},
        ),
    params:
        out_dir=lambda w, output: os.path.dirname(output.csv),
    log:
        f"{LOGS}/aggregate/{{dataset}}.log",
    benchmark:
        f"{BENCH}/aggregate/{{dataset}}.tsv"
    conda:
        CONDA_ENV
    script:
        "../scripts/aggregate.py"
