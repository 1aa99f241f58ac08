-- Mail finds its sender's user by address without case (`Store::user_by_email`): an index
-- on the expression, so a message does not scan every user.
CREATE INDEX users_email_lower ON users (LOWER(email));
