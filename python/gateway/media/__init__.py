"""Media uploads (issue 17): content sniffing (:mod:`.sniff`), facts from content
(:mod:`.probe`) and object storage on disk or S3 (:mod:`.objects`)."""
