rule aggregate:
    input:
        dataset_metrics,
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
