"""Real servers (S3 via versitygw, WebDAV via nginx) started on free loopback ports for the tests."""
