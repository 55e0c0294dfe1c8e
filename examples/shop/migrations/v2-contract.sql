-- Once v1 is retired: v2 no longer reads legacy_code. This would break v1, so it runs only in
-- the contract step, never while v1 could be rolled back to.
ALTER TABLE products DROP COLUMN IF EXISTS legacy_code;
