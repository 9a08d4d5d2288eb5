"""bytemtp_corpora: named built-in corpora for ``bytemtp prepare builtin:NAME``."""
