"""Where payloads live: the content-addressed store (`cas`: file backend and the blob and
table helpers), its S3 backend (`s3`), and the fabric's own record of its data directory
(`fabric`)."""
