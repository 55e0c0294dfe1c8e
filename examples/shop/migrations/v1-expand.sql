-- The shop's first schema.
CREATE TABLE IF NOT EXISTS products (
    id integer PRIMARY KEY,
    name text NOT NULL,
    legacy_code text NOT NULL
);
INSERT INTO products (id, name, legacy_code) VALUES
    (1, 'tea', 'T-01'), (2, 'coffee', 'C-07'), (3, 'cocoa', 'K-12')
ON CONFLICT (id) DO NOTHING;
