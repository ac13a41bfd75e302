from gbp_rewrite.cli import run

run()
