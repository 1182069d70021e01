"""Tools beside the pipeline: MLflow's UI on the comparison and a throwaway team MLflow server."""
