"""Graph-level tools: node metadata, pattern declarations and matcher, summary, drawing."""
