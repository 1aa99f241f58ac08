#!/usr/bin/python3
"""Sends a message read from stdin with Python's smtplib, after signing it with DKIM
(Debian's python3-dkim, dkimpy) when a key is given. For the tests of commands by mail.

Usage: dkim_send.py <port> <envelope from> <envelope to> [<domain> <selector> <key PEM file>]
Prints the server's answer to DATA; exits 1 if the server refused the message."""
import smtplib
import sys

import dkim


def main():
    port, mail_from, rcpt_to = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    message = sys.stdin.buffer.read()
    if len(sys.argv) == 7:
        domain, selector, key_file = sys.argv[4], sys.argv[5], sys.argv[6]
        with open(key_file, "rb") as f:
            key = f.read()
        signature = dkim.sign(message, selector.encode(), domain.encode(), key,
                              include_headers=[b"from", b"to", b"subject", b"message-id"])
        message = signature + message
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo("tests.example")
        try:
            smtp.sendmail(mail_from, [rcpt_to], message)
        except smtplib.SMTPException as e:
            print("refused:", e)
            sys.exit(1)
    print("sent")


if __name__ == "__main__":
    main()
