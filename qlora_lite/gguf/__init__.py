"""GGUF export for llama.cpp and Ollama: the writer, the tokenizer vocabulary, the Ollama Modelfile, and
the read-back check of the written file."""
