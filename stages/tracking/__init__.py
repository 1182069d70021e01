"""MLflow: the store, one tagged run per stage execution, links into its UI."""
