-- When a pending chat user was last told how to get access: a pending user's
-- plain messages are answered with that help at most once per interval
-- (hub/_channel_chat.py), not once per message (spam protection: an unknown
-- sender could otherwise make the bot answer every message it is sent).
ALTER TABLE channel_users ADD COLUMN access_help_sent_at timestamptz;
