"""KFP pipelines (DAGs) over the stage components, their compilation and local runs."""
