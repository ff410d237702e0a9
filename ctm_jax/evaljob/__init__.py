"""The evaluation binary's library: settings (config.eval), shard files, jobs and reports."""
