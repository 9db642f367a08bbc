-- oauth2-introspection guard, for Kong's post-function plugin (access phase).
-- Kong OSS passes a request on when the plugin server is down, hung or drops
-- the connection; this refuses any request the plugin did not decide.
local run_on_preflight = true
return function()
  if kong.client.get_credential() or kong.client.get_consumer() then
    return
  end
  if not run_on_preflight and kong.request.get_method() == "OPTIONS" then
    return
  end
  return kong.response.exit(503, { message = "authentication unavailable" })
end
