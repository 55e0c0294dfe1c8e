-- v2 shows prices. Additive: v1 keeps reading what it reads, v2 finds its column.
ALTER TABLE products ADD COLUMN IF NOT EXISTS price_cents integer NOT NULL DEFAULT 0;
UPDATE products SET price_cents = 250 WHERE id = 1 AND price_cents = 0;
UPDATE products SET price_cents = 320 WHERE id = 2 AND price_cents = 0;
UPDATE products SET price_cents = 290 WHERE id = 3 AND price_cents = 0;
