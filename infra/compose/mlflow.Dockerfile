# The MLflow tracking server with what the official image lacks: the PostgreSQL driver for the
# backend store and boto3 for the S3 artifact store. Pinned to the MLflow of the training image.
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir psycopg2-binary==2.9.13 boto3==1.43.117
