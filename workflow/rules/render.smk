rule render_trigger:
    input:
        poison=f"{RESULTS}/{{dataset}}/{{attack}}/poison-seed{config['seeds'][0]}.h5",
    output:
        report(
            f"{RESULTS}/figures/{{dataset}}/{{attack}}.png",
            caption="../report/trigger.rst",
            category="Triggers",
            labels={"dataset": "{dataset}", "attack": "{attack}"},
        ),
    log:
        f"{LOGS}/render_trigger/{{dataset}}/{{attack}}.log",
    benchmark:
        f"{BENCH}/render_trigger/{{dataset}}/{{attack}}.tsv"
    threads: 1
    conda:
        CONDA_ENV
    script:
        "../scripts/render_trigger.py"
