-- Runs once, when the PostgreSQL volume is first initialised: MLflow's backend store lives
-- beside the ops database (`flood`) on the same server, in its own database.
CREATE DATABASE mlflow;
