#!/usr/bin/python3
"""The relay Hearth's replies go to in the tests: aiosmtpd (Debian's python3-aiosmtpd)
on 127.0.0.1:<port>, writing each message it receives to <dir>/<n>.eml, with the envelope
in X-Sink-Mail-From and X-Sink-Rcpt-To headers on top. Runs until killed."""
import asyncio
import os
import sys

from aiosmtpd.controller import Controller


class Keep:
    def __init__(self, directory):
        self.directory = directory
        self.count = 0

    async def handle_DATA(self, server, session, envelope):
        self.count += 1
        head = "X-Sink-Mail-From: {}\r\nX-Sink-Rcpt-To: {}\r\n".format(
            envelope.mail_from, ",".join(envelope.rcpt_tos))
        path = os.path.join(self.directory, "{:04}.eml".format(self.count))
        with open(path + ".tmp", "wb") as f:
            f.write(head.encode() + envelope.original_content)
        os.rename(path + ".tmp", path)
        return "250 kept"


def main():
    port, directory = int(sys.argv[1]), sys.argv[2]
    controller = Controller(Keep(directory), hostname="127.0.0.1", port=port)
    controller.start()
    print("ready", flush=True)
    try:
        asyncio.get_event_loop().run_forever()
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
