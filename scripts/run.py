"""Run one job (or a sweep with -m): see configs/config.yaml."""
from visiondrop.harness.app import cli

if __name__ == "__main__":
    cli()
