"""shapes-v1, the built-in dataset: its generator (`dataset`) and its pixel-rule caption checker
(`checker`). Library code for any image-text data does not need this package; training on shapes-v1
and the prompt-following evaluation plug it in."""
