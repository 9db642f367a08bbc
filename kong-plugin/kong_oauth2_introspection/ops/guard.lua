-- oauth2-introspection guard, for Kong's post-function plugin (access phase).
-- Kong OSS passes a request on when the plugin server is down, hung or drops
-- the connection; this refuses any request the plugin did not decide.
local run_on_preflight = true
local logical_or = false
-- Our plugins mark the credential they authenticate a request with: another
-- plugin's credential alone must not pass while ours could not run.
local ours = { ["oauth2-introspection"] = true, ["oauth2-client-credentials"] = true }
return function()
  local credential = kong.client.get_credential()
  if credential and ours[credential.authenticated_by] then
    return
  end
  -- With anonymous set, our plugin lets another plugin's caller (or the
  -- anonymous consumer) through: so does the guard.
  if logical_or and (credential or kong.client.get_consumer()) then
    return
  end
  if not run_on_preflight and kong.request.get_method() == "OPTIONS" then
    return
  end
  return kong.response.exit(503, { message = "authentication unavailable" })
end
