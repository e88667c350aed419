"""`saerl-ray validate`: the SAE against length, TF-IDF and random features on difficulty, topics and
quality (validate), with the difficulty side runs (validate_difficulty)."""
