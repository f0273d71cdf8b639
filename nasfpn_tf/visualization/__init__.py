"""Pictures of what people look at: architectures, search progress."""
