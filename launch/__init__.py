"""Runs on the user's workstation: start SageMaker training jobs and endpoints for the image (boto3)."""
