"""tokenprune: faster vision-language models by processing fewer visual tokens."""
