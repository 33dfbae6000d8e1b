-- Whether a Desktop command was submitted by a channel (hub/channels/_sessions.py):
-- the channel router reads its channel_submissions row when the command is final
-- (a binding's session made, a chat told of a failure) only when it was. The
-- commands the admin API submits, most of them, then cost no read after their
-- final ack. NULL: accepted before this column existed; the router reads for those
-- as it always did.
ALTER TABLE pairing_commands ADD COLUMN from_channel boolean;
