"""A container image as a tree in memory: tar streams read strictly, layers applied, the output layer compressed."""
