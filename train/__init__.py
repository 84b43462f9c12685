"""Fine-tuning: hyperparameters → data → TRL trainer → merged model in the model directory."""
