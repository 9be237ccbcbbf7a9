"""Coverage-guided fuzzing (atheris, libFuzzer) of the parsers that take bytes or text from the network."""
