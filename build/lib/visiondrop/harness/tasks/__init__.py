"""lmms-eval task folders shipped with the project (pass this folder as --include_path)."""
