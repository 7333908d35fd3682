# controlled_mailbox.py: aiosmtpd handler for the TAP tests. It stores every
# message in a Maildir like aiosmtpd.handlers.Mailbox, unless the file
# <maildir>.reply holds an SMTP reply (for example "550 5.7.1 Refused"):
# then DATA is answered with that reply and nothing is stored. The tests
# write and remove the file to make the server refuse or accept mail.
from aiosmtpd.handlers import Mailbox


class ControlledMailbox(Mailbox):
    def __init__(self, mail_dir):
        super().__init__(mail_dir)
        self.control = str(mail_dir).rstrip('/') + '.reply'

    async def handle_DATA(self, server, session, envelope):
        try:
            with open(self.control) as f:
                reply = f.read().strip()
        except FileNotFoundError:
            reply = ''
        if reply:
            return reply
        return await super().handle_DATA(server, session, envelope)
